"""tensorflow-datasets builders."""
