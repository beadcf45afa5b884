"""Running the command line in-process for tests (shared by test_cli and test_checker)."""
from fractalbench.harness.cli import main


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``fractalbench ARGV`` run in this process."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
