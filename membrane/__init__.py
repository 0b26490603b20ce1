"""The membrane command line and the local cluster it runs."""
