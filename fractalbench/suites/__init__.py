"""Suite files are data (YAML), packaged so that an installed fractalbench finds its bundled suites."""
