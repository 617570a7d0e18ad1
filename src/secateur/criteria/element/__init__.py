"""Element criteria: one score per weight (magnitude, random, LAMP, Taylor, SNIP, GraSP, SynFlow)."""
