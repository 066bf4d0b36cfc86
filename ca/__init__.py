"""Certificate authority and leader election (issue 4)."""
