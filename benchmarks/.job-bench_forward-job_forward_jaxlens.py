import json, sys; sys.path.insert(0, '/work/main/benchmarks'); import bench_forward as b; print('RESULT' + json.dumps(b.JOBS['job_forward_jaxlens'](*json.loads(sys.argv[1]))))
