"""qtwist: a qmail-compatible mail platform built on Twisted."""
