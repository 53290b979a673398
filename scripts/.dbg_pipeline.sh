set +e
PI0_CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 PI0_BUILD_DIR=$PWD/build-gpu bash -c 'source scripts/setup.sh; pi0_build' > /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
B=build-gpu/bin; A="--model pi0-2l --seed 11 --frames 2 --warmup 0 --quiet-workers --log-level warn"
$B/orchestrator --backend cpu $A --actions-out /tmp/cpu.f32 | grep -E "latency p50"
$B/orchestrator --backend cuda --no-mps $A --actions-out /tmp/nomps.f32 | grep -E "split"
$B/orchestrator --backend cuda $A --encoder-pct 100 --decoder-pct 100 --actions-out /tmp/m100.f32 | grep -E "split"
$B/orchestrator --backend cuda $A --encoder-pct 30 --decoder-pct 70 --actions-out /tmp/m30.f32 | grep -E "split"
python3 -c "
import numpy as np
r=np.fromfile('/tmp/cpu.f32',dtype=np.float32)
for n in ['nomps','m100','m30']:
  g=np.fromfile('/tmp/'+n+'.f32',dtype=np.float32); h=len(g)//2
  print(n, 'frame0 %.3e frame1 %.3e'%(np.linalg.norm(g[:h]-r[:h])/np.linalg.norm(r[:h]), np.linalg.norm(g[h:]-r[h:])/np.linalg.norm(r[h:])))
"
bash scripts/start_mps.sh >/dev/null
for p in 30 100; do CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$p build-gpu/tests/pi0_gpu_tests "pi0-2l stages match the reference" 2>&1 | grep -E "rel error|passed|failed" | head -5; done
echo quit | nvidia-cuda-mps-control
