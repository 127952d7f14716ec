"""The project the how-tos' examples belong to (their tests run every one of them)."""
