"""The model core: config, sites, the shared decoder and `forward`, interventions, reducers, sharding rules."""
