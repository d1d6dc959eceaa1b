"""The keeper of processes: ``sumbatch up``'s supervisor and its children, the embedded
server and local cluster, checks made before starting, and the run loop of a
long-lived process. May import everything below the command line but ``client``."""
