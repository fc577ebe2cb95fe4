"""Validates an OpenAPI document against the OpenAPI 3 specification.

Usage: validate_openapi.py PATH
"""

import sys

from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

spec, _ = read_from_filename(sys.argv[1])
validate(spec)
print("valid")
