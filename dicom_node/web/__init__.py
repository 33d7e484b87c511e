"""The radiologist's AI worklist in the browser and its JSON API (the ``web`` role)."""
