"""Who is calling: principals (``principal.py``), API tokens and peer credentials."""
