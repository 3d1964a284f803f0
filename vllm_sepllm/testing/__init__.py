"""Test helpers: a real small model and real text, both built offline from registry packages."""
