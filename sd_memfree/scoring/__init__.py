"""The memorization scorer (method.md, section 5): SSCD similarity of generations to the training
set, CLIP score, FID, pixel-space copy test, and a report. The CLI is ``scoring.run``."""
