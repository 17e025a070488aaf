"""Data: the record types (:mod:`.schema`), validation with file:line problems (:mod:`.validate`),
safe image IO (:mod:`.images`), generation requests (:mod:`.requests`), the catalog for training
(:mod:`.catalog`) and the built-in datasets (:mod:`.datasets`)."""
