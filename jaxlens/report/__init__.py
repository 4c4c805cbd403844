"""Outputs: atomic files, figures, HTML reports."""
