"""The mTLS data plane (issue 5)."""
