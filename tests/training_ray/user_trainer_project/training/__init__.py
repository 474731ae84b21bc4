"""The user's own ``training`` package (Tidal's is ``tidal.training``: the two never collide)."""

OWNER = "user"
