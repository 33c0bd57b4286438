"""What a reader sees: tables, figures, cases, the explorer, the results file, the article's values and the
report's pages. Reads the records the stages wrote; writes tables, figures and pages, nothing the stages read."""
