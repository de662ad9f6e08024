"""Key and team records: their form, the Redis store, the local cache and its invalidation."""
