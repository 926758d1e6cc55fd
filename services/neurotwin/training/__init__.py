"""Training and export. Never imported by the serving path."""
