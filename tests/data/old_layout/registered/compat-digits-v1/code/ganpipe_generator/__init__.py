"""ganpipe's networks, shipped with a registered generator."""
