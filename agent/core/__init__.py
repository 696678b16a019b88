"""What the agent knows and decides, used by the daemon and the CLI and importing neither:
the binding decision (``binding``, pure ``decide``), the radio gate's state machine
(``gate``, sans-IO), callers' AT policy (``at_rules``), tokens, the evidence chain, the
state store, trusted time (``clock``), the configuration, the reported facts (``facts``)
and the diagnosis checks (``checks``)."""
