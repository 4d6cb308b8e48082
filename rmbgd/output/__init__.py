"""Publishing results atomically, done/ and errors/, and the retry verdicts for write errors."""
