"""An app module whose import fails, for the startup and `preforkd check` failure tests."""

raise RuntimeError("pf_broken_app refuses to import")
