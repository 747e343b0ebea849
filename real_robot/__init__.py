"""WidowX wire protocol, client, safety layer, control loop, simulated WidowX service."""
