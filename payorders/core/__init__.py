"""The core: the rules, the payloads, our SQL, reconciliation's rules, settings, metrics and
search attributes. It imports none of the edges (gateways, service, sandbox, tools)."""
