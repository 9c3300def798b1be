"""Edge–cloud collaboration: the cloud connection and the offloading policy (strategies: :mod:`agent.strategies`)."""
