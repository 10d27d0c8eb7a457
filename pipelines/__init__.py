"""Ray Data jobs assembled from the stages in `capfilt`."""
