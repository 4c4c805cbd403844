"""The probes and interventions of the papers, built on the core and the runtime."""
