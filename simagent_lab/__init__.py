"""The lab: what tests, CI and demos need and a terminal does not. The fake modem on a
pseudo-terminal (``simagent-fakemodem``), its pytest plugin (for our CI and our users'),
the local broker and agent runners, and ``simagent demo``. The pip package carries it;
the Debian package leaves it out (packaging/build-deb)."""
