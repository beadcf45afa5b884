"""Turns stored results into tables, plots and the HTML report. Reads results only."""
