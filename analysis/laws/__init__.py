"""Scaling laws and their fitters: Kaplan, Chinchilla Approaches 1-3, any Law, data-constrained, lr, downstream."""
