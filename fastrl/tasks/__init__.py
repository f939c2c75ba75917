"""Built-in tasks with verifiable rewards; the embedded demo lives here."""
