"""A small Django project for tests/integration/test_frameworks.py: the admin, sessions,
messages and CSRF as a real site has them, and views that report what Django computed from
the environ. The test copies this directory beside the server's config, since it edits
views.py and keeps its sqlite database there."""
