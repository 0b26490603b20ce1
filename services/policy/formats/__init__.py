"""The policy formats membrane reads; :mod:`services.policy.parser` is their entry point."""
