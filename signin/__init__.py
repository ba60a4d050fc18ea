"""Sign-in: the gateway as an OIDC relying party that mints short-lived session tokens."""
