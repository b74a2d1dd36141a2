"""Speculative decoding: draft proposers (Gemma 4's assistant drafter, n-gram prompt lookup) and verification."""
