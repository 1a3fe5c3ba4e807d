"""The pytest plugin (hooks, and the session object they share) and hypothesis strategies."""
