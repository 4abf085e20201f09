"""A discrete-event simulator of a continuous-batching engine that drives the
same TAPER controller as the live scheduler hook."""
