"""TFDS builders for the tests, in a package so that TFDS treats them as it treats its own (a builder in a
package module reaches `DatasetBuilder.code_path` through importlib_resources, as cifar10 does)."""
