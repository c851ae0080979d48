"""Building blocks of the models; tensor-parallel sharding lives beside each layer as its `weight_loader`."""
