"""Versioned SQL migrations; a package only so the .sql files ship in the wheel."""
