"""The console's views: each builds the plain dict its page and its API answer show."""
