#!/usr/bin/env python3
"""OTLP profiles (v1development) test double's checker, over PyPI's opentelemetry-proto.

  check FILE              decode an ExportProfilesServiceRequest and check the rules a
                          receiver enforces (a port of profcheck's: the zero value at index
                          0 of every dictionary table, string_table[0] == "", every index in
                          range, sample shape, timestamps inside the profile, mapping
                          bounds, profile ids); exit 0 and print a JSON summary, or exit 1
                          and print the rules broken
  reference OUT           write a request built with the official types alone
  mutate IN KIND OUT      write a copy of IN broken in one way: index_out_of_range,
                          nonempty_string0, missing_zero_entry
"""
import json
import sys

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as svc
from opentelemetry.proto.common.v1 import common_pb2 as common
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb


def check(req):
    errors = []
    d = req.dictionary
    tables = {
        "mapping_table": (d.mapping_table, pb.Mapping()),
        "location_table": (d.location_table, pb.Location()),
        "function_table": (d.function_table, pb.Function()),
        "link_table": (d.link_table, pb.Link()),
        "attribute_table": (d.attribute_table, pb.KeyValueAndUnit()),
        "stack_table": (d.stack_table, pb.Stack()),
    }
    for name, (table, zero) in tables.items():
        if len(table) == 0:
            errors.append(f"{name} is empty (needs its zero value at 0)")
        elif table[0] != zero:
            errors.append(f"{name}[0] is not the zero value")
    if len(d.string_table) == 0 or d.string_table[0] != "":
        errors.append('string_table[0] is not ""')

    def idx(what, i, table):
        if not 0 <= i < len(table):
            errors.append(f"{what} {i} out of range (len {len(table)})")
            return False
        return True

    s = d.string_table
    for i, m in enumerate(d.mapping_table):
        idx(f"mapping_table[{i}].filename_strindex", m.filename_strindex, s)
        for a in m.attribute_indices:
            idx(f"mapping_table[{i}].attribute_indices", a, d.attribute_table)
        if m.memory_limit and m.memory_start >= m.memory_limit:
            errors.append(f"mapping_table[{i}]: memory_start >= memory_limit")
    for i, f in enumerate(d.function_table):
        for fld in ("name_strindex", "system_name_strindex", "filename_strindex"):
            idx(f"function_table[{i}].{fld}", getattr(f, fld), s)
    for i, loc in enumerate(d.location_table):
        idx(f"location_table[{i}].mapping_index", loc.mapping_index, d.mapping_table)
        for ln in loc.lines:
            idx(f"location_table[{i}].lines.function_index", ln.function_index, d.function_table)
        for a in loc.attribute_indices:
            idx(f"location_table[{i}].attribute_indices", a, d.attribute_table)
    for i, st in enumerate(d.stack_table):
        for li in st.location_indices:
            idx(f"stack_table[{i}].location_indices", li, d.location_table)
    for i, a in enumerate(d.attribute_table):
        idx(f"attribute_table[{i}].key_strindex", a.key_strindex, s)
        idx(f"attribute_table[{i}].unit_strindex", a.unit_strindex, s)
    for i, link in enumerate(d.link_table[1:], 1):
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            errors.append(f"link_table[{i}] has ids of the wrong length")

    summary = []
    if not req.resource_profiles:
        errors.append("no resource_profiles")
    for rp in req.resource_profiles:
        res = {kv.key: kv.value.string_value for kv in rp.resource.attributes}
        if not res.get("service.name"):
            errors.append("resource without service.name")
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                for fld in ("type_strindex", "unit_strindex"):
                    idx(f"sample_type.{fld}", getattr(p.sample_type, fld), s)
                    idx(f"period_type.{fld}", getattr(p.period_type, fld), s)
                if len(p.profile_id) not in (0, 16):
                    errors.append("profile_id is neither empty nor 16 bytes")
                for a in p.attribute_indices:
                    idx("profile.attribute_indices", a, d.attribute_table)
                end = p.time_unix_nano + p.duration_nano
                for smp in p.samples:
                    ok = idx("sample.stack_index", smp.stack_index, d.stack_table)
                    idx("sample.link_index", smp.link_index, d.link_table)
                    attrs = {}
                    for a in smp.attribute_indices:
                        if idx("sample.attribute_indices", a, d.attribute_table):
                            kv = d.attribute_table[a]
                            key = s[kv.key_strindex] if 0 <= kv.key_strindex < len(s) else "?"
                            which = kv.value.WhichOneof("value")
                            attrs[key] = getattr(kv.value, which) if which else None
                    if not smp.timestamps_unix_nano and len(smp.values) != 1:
                        errors.append(f"sample has {len(smp.values)} values for one sample type")
                    if smp.timestamps_unix_nano and smp.values and len(smp.values) != len(smp.timestamps_unix_nano):
                        errors.append("sample values and timestamps differ in length")
                    for t in smp.timestamps_unix_nano:
                        if not p.time_unix_nano <= t < end:
                            errors.append("sample timestamp outside the profile")
                    stack = []
                    if ok:
                        for li in reversed(d.stack_table[smp.stack_index].location_indices):
                            if 0 <= li < len(d.location_table):
                                for ln in reversed(d.location_table[li].lines):
                                    if 0 <= ln.function_index < len(d.function_table):
                                        fn = d.function_table[ln.function_index]
                                        if 0 <= fn.name_strindex < len(s):
                                            stack.append(s[fn.name_strindex])
                    summary.append({
                        "service": res.get("service.name"),
                        "host": res.get("host.name"),
                        "sample_type": [s[p.sample_type.type_strindex], s[p.sample_type.unit_strindex]]
                        if 0 <= p.sample_type.unit_strindex < len(s) and 0 <= p.sample_type.type_strindex < len(s) else None,
                        "period": p.period,
                        "time_unix_nano": p.time_unix_nano,
                        "stack": stack,
                        "attributes": attrs,
                        "values": list(smp.values),
                    })
    return errors, summary


def reference():
    """A small request built with the official types alone (two functions, one sample)."""
    d = pb.ProfilesDictionary()
    d.string_table.extend(["", "samples", "count", "cpu", "nanoseconds", "/bin/ref", "main", "work", "thread.name", "t1"])
    d.mapping_table.add()
    d.mapping_table.add(filename_strindex=5)
    d.function_table.add()
    d.function_table.add(name_strindex=6, system_name_strindex=6)
    d.function_table.add(name_strindex=7, system_name_strindex=7)
    d.location_table.add()
    loc = d.location_table.add(mapping_index=1, address=0x1000)
    loc.lines.add(function_index=1, line=3)
    loc = d.location_table.add(mapping_index=1, address=0x2000)
    loc.lines.add(function_index=2, line=9)
    d.link_table.add()
    d.attribute_table.add()
    d.attribute_table.add(key_strindex=8, value=common.AnyValue(string_value="t1"))
    d.stack_table.add()
    d.stack_table.add(location_indices=[2, 1])
    req = svc.ExportProfilesServiceRequest(dictionary=d)
    rp = req.resource_profiles.add()
    rp.resource.attributes.add(key="service.name", value=common.AnyValue(string_value="ref"))
    sp = rp.scope_profiles.add()
    p = sp.profiles.add(time_unix_nano=1_700_000_000_000_000_000, duration_nano=10_000_000_000, period=10_101_010)
    p.sample_type.type_strindex, p.sample_type.unit_strindex = 1, 2
    p.period_type.type_strindex, p.period_type.unit_strindex = 3, 4
    p.samples.add(stack_index=1, attribute_indices=[1], values=[5])
    return req


def mutate(req, kind):
    d = req.dictionary
    if kind == "index_out_of_range":
        d.stack_table[1].location_indices.append(len(d.location_table))
    elif kind == "nonempty_string0":
        d.string_table[0] = "x"
    elif kind == "missing_zero_entry":
        del d.function_table[0]
    else:
        raise SystemExit(f"unknown mutation {kind}")
    return req


def main():
    cmd = sys.argv[1]
    if cmd == "check":
        req = svc.ExportProfilesServiceRequest()
        try:
            req.ParseFromString(open(sys.argv[2], "rb").read())
        except Exception as e:  # a body that does not decode is a rejection too
            print(f"decode: {e}")
            sys.exit(1)
        errors, summary = check(req)
        if errors:
            print("\n".join(sorted(set(errors))))
            sys.exit(1)
        print(json.dumps(summary))
    elif cmd == "reference":
        open(sys.argv[2], "wb").write(reference().SerializeToString())
    elif cmd == "mutate":
        req = svc.ExportProfilesServiceRequest()
        req.ParseFromString(open(sys.argv[2], "rb").read())
        open(sys.argv[4], "wb").write(mutate(req, sys.argv[3]).SerializeToString())
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
