"""A Django project's pieces, for the Django how-to (its test runs them)."""
