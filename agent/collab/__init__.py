"""Edge–cloud collaboration: the cloud strategy, speculative decoding across the network, offloading."""
