"""Service discovery in ZooKeeper: teachers register ephemeral nodes, students watch them and share them fairly."""
