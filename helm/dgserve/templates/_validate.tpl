{{/* Combinations values.schema.json cannot express: each fails the render with what is wrong and what to do. */}}
{{- define "dgserve.validate" -}}
{{- $v := .Values -}}
{{- $p := $v.profile -}}
{{- $e := $v.engine -}}
{{- range $name := splitList "," (include "dgserve.gpuGroups" .) -}}
{{- if not (index $v.workerGroups $name) -}}
{{- fail (printf "profile %s needs workerGroups.%s (it is missing or null)" $p $name) -}}
{{- end -}}
{{- $g := index $v.workerGroups $name -}}
{{- if gt ($g.minReplicas | int) ($g.maxReplicas | int) -}}
{{- fail (printf "workerGroups.%s.minReplicas (%v) is above maxReplicas (%v)" $name $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- if or (lt ($g.replicas | int) ($g.minReplicas | int)) (gt ($g.replicas | int) ($g.maxReplicas | int)) -}}
{{- fail (printf "workerGroups.%s.replicas (%v) is outside minReplicas..maxReplicas (%v..%v)" $name $g.replicas $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- if gt ($e.units.min | int) ($e.units.max | int) -}}
{{- fail (printf "engine.units.min (%v) is above engine.units.max (%v)" $e.units.min $e.units.max) -}}
{{- end -}}
{{- if and (eq $p "replicated") (gt ($e.expertRanks | int) 0) -}}
{{- fail (printf "profile replicated keeps the experts in every attention rank: engine.expertRanks must be 0 (it is %v); use profile packed or disaggregated for expert ranks" $e.expertRanks) -}}
{{- end -}}
{{- if and (ne $p "replicated") (eq ($e.expertRanks | int) 0) -}}
{{- fail (printf "profile %s puts the routed experts on expert ranks: engine.expertRanks must be at least 1" $p) -}}
{{- end -}}
{{- /* FP8 experts run on GPUs: the group holding the expert ranks (or, replicated, the attention ranks) needs them. */ -}}
{{- if eq $v.model.expertsDtype "fp8" -}}
{{- $role := ternary "attention" "experts" (eq $p "replicated") -}}
{{- $group := ternary "expert" "engine" (eq $p "disaggregated") -}}
{{- $rank := index $e.rankResources $role -}}
{{- $grp := index $v.workerGroups $group -}}
{{- if or (ne $v.model.device "cuda") (eq ($grp.gpus | int) 0) (eq (($rank.gpus | default 0) | float64) 0.0) -}}
{{- fail (printf "model.expertsDtype fp8 needs GPUs where the experts run: model.device cuda (is %s), workerGroups.%s.gpus > 0 (is %v) and engine.rankResources.%s.gpus > 0 (is %v); or set model.expertsDtype auto" $v.model.device $group $grp.gpus $role $rank.gpus) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.model.device "cuda") (eq ((index $v.workerGroups (ternary "attention" "engine" (eq $p "disaggregated"))).gpus | int) 0) -}}
{{- fail "model.device cuda needs GPUs in the worker group of the attention ranks (its gpus is 0); set model.device cpu for a CPU trial" -}}
{{- end -}}
{{- /* A packed unit lives in one pod (STRICT_PACK): its ranks' GPUs and CPUs must fit in one. */ -}}
{{- if eq $p "packed" -}}
{{- $a := $e.rankResources.attention -}}
{{- $x := $e.rankResources.experts -}}
{{- $gpus := addf (mulf ($e.attentionRanks | float64) ($a.gpus | default 0 | float64)) (mulf ($e.expertRanks | float64) ($x.gpus | default 0 | float64)) -}}
{{- $cpus := addf (mulf ($e.attentionRanks | float64) ($a.cpus | default 1 | float64)) (mulf ($e.expertRanks | float64) ($x.cpus | default 1 | float64)) 1.0 -}}
{{- if gt $gpus ($v.workerGroups.engine.gpus | float64) -}}
{{- fail (printf "profile packed places a whole unit in one pod: its ranks take %v GPUs but workerGroups.engine.gpus is %v" $gpus $v.workerGroups.engine.gpus) -}}
{{- end -}}
{{- if gt $cpus ($v.workerGroups.engine.rayCpus | float64) -}}
{{- fail (printf "profile packed places a whole unit in one pod: its ranks and replica take %v Ray CPUs but workerGroups.engine.rayCpus is %v" $cpus $v.workerGroups.engine.rayCpus) -}}
{{- end -}}
{{- end -}}
{{- if and $v.tls.clientCaSecret $v.http.enabled -}}
{{- fail "tls.clientCaSecret (client certificates) needs http.enabled false: Serve's HTTP proxy cannot require client certificates" -}}
{{- end -}}
{{- if and $v.tls.clientCaSecret (not $v.tls.existingSecret) -}}
{{- fail "tls.clientCaSecret needs tls.existingSecret (client certificates need TLS)" -}}
{{- end -}}
{{- if and (ne $v.gateway.service.type "ClusterIP") (not $v.tls.existingSecret) (not $v.gateway.service.allowPlaintextExternal) -}}
{{- fail (printf "gateway.service.type %s exposes the endpoint outside the cluster in plaintext: set tls.existingSecret, or gateway.service.allowPlaintextExternal true if something in front encrypts" $v.gateway.service.type) -}}
{{- end -}}
{{- if and $v.http.enabled (ne $v.http.service.type "ClusterIP") (not (and $v.tls.existingSecret $v.http.tls)) (not $v.gateway.service.allowPlaintextExternal) -}}
{{- fail (printf "http.service.type %s exposes the HTTP API outside the cluster in plaintext: set tls.existingSecret and http.tls true, or gateway.service.allowPlaintextExternal true if something in front encrypts" $v.http.service.type) -}}
{{- end -}}
{{- if and $v.http.tls (not $v.tls.existingSecret) -}}
{{- fail "http.tls needs tls.existingSecret (the certificate Serve's proxy serves)" -}}
{{- end -}}
{{- /* Ports: each listens once in a pod, and Ray's own ports are taken. */ -}}
{{- $ports := dict -}}
{{- range $entry := list (list "gateway.port" $v.gateway.port) (list "http.port" $v.http.port) (list "monitoring.metricsPort" $v.monitoring.metricsPort) -}}
{{- $port := index $entry 1 | int | toString -}}
{{- if has ($port | int) (list 6379 8265 10001 52365) -}}
{{- fail (printf "%s %s is one of Ray's ports (6379 GCS, 8265 dashboard, 10001 client, 52365 dashboard agent): choose another" (index $entry 0) $port) -}}
{{- end -}}
{{- if hasKey $ports $port -}}
{{- fail (printf "%s and %s are both %s: each port listens once in a pod" (get $ports $port) (index $entry 0) $port) -}}
{{- end -}}
{{- $_ := set $ports $port (index $entry 0) -}}
{{- end -}}
{{- if and (eq $v.fabric.profile "roce") (not $v.fabric.networks) -}}
{{- fail "fabric.profile roce needs fabric.networks (the Multus network of the RoCE interface that NCCL_SOCKET_IFNAME=net1 names)" -}}
{{- end -}}
{{- /* Units fit the pods the autoscaler may add (replicated and packed: whole units per pod). */ -}}
{{- if and (ne $p "disaggregated") (eq $v.model.device "cuda") -}}
{{- $grp := $v.workerGroups.engine -}}
{{- $a := $e.rankResources.attention -}}
{{- $x := $e.rankResources.experts -}}
{{- $unitGpus := addf (mulf ($e.attentionRanks | float64) ($a.gpus | default 0 | float64)) (mulf ($e.expertRanks | float64) ($x.gpus | default 0 | float64)) -}}
{{- if gt $unitGpus 0.0 -}}
{{- $perPod := floor (divf ($grp.gpus | float64) $unitGpus) -}}
{{- $most := mulf $perPod ($grp.maxReplicas | float64) -}}
{{- if gt ($e.units.max | float64) $most -}}
{{- fail (printf "engine.units.max (%v) is more units than workerGroups.engine can hold: %v pods x %v units per pod (a unit takes %v GPUs of a pod's %v); raise workerGroups.engine.maxReplicas" $e.units.max $grp.maxReplicas $perPod $unitGpus $grp.gpus) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.fabricCheck.enabled $v.fabricCheck.crossPod.enabled $v.fabricCheck.crossPod.group (not (has $v.fabricCheck.crossPod.group (splitList "," (include "dgserve.gpuGroups" .)))) -}}
{{- fail (printf "fabricCheck.crossPod.group %s is not a GPU group of profile %s (%s)" $v.fabricCheck.crossPod.group $p (include "dgserve.gpuGroups" .)) -}}
{{- end -}}
{{- if and $v.fabricCheck.enabled (ne $v.model.device "cuda") -}}
{{- fail "fabricCheck.enabled runs NCCL on the GPU worker pods: it needs model.device cuda" -}}
{{- end -}}
{{- if eq $v.rayService.upgradeStrategy "NewClusterWithIncrementalUpgrade" -}}
{{- $o := $v.rayService.clusterUpgradeOptions | default dict -}}
{{- if not (and $o.gatewayClassName $o.stepSizePercent $o.intervalSeconds) -}}
{{- fail "rayService.upgradeStrategy NewClusterWithIncrementalUpgrade needs rayService.clusterUpgradeOptions (gatewayClassName, stepSizePercent, intervalSeconds)" -}}
{{- end -}}
{{- if not $v.rayService.autoscaler.enabled -}}
{{- fail "rayService.upgradeStrategy NewClusterWithIncrementalUpgrade needs rayService.autoscaler.enabled (KubeRay scales the new cluster up step by step)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
