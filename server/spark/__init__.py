"""The Spark aggregation engine; the only package that imports pyspark (it starts a JVM)."""

from entremise.server.spark.engine import SparkEngine

__all__ = ["SparkEngine"]
