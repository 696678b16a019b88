"""pytest plugin: the `fake_modem` fixture (filled in by the fake-modem work)."""
