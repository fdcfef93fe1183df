"""Building blocks of the LungNLB MONAI Label app: config, model store, datastore, tasks."""
