"""The reliability and security suite: bad files, faults, hostile peers."""
